//! The reconnect storm: after a restart every client reconnects at once. N clients connect as
//! fast as one generator thread can, while a small room of clients that were already there
//! keeps chatting.
//!
//! - **Storm clients**: one thread opens them with nonblocking connects (mio), a batch at a time
//!   between polls, and reads every one of them all the time. A client is greeted when its
//!   welcome line arrives (peerchat: `* welcome, you are …`) or, for Redis, the confirmation of
//!   the `SUBSCRIBE chat` it sends as soon as it is connected. A connect that is refused, reset
//!   or closed before the greeting is retried after a pause, at most `MAX_RETRIES` times.
//! - **Presence**: every `* … joined` / `* … left` line any client gets (storm and room) is
//!   counted in bytes, never stored. After the last greeting the storm thread keeps reading
//!   until no presence line has come for `SETTLE`, so the total is complete.
//! - **The room**: `ROOM_MEMBERS` clients connected before the storm, each sending a numbered,
//!   timestamped line every `room_interval` from a thread of their own. Every member checks it
//!   gets every other member's lines, complete and in order, and measures their latency.
//!   Redis members use a second connection to `PUBLISH` on the channel they subscribe to.
//! - **Bounds**: everything ends by `DEADLINE` after the first connect; a storm not over by
//!   then is reported as not complete.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

use super::servers::{Kind, ServerProcess};
use super::stats::{own_cpu_seconds, Histogram};

/// Clients already in the room, chatting through the storm.
pub const ROOM_MEMBERS: usize = 10;
/// How long the room chats before the storm begins (its latency then is the calm baseline).
const WARM_UP: Duration = Duration::from_secs(1);
/// Presence counting ends after this long without a presence line (or greeting).
const SETTLE: Duration = Duration::from_secs(2);
/// From the first connect, everything (greetings and settling) must be over by then.
const DEADLINE: Duration = Duration::from_secs(60);
/// After the room stops sending, how long its last lines may take to arrive.
const ROOM_DRAIN: Duration = Duration::from_secs(10);
/// Reconnects per client after a refused, reset or closed connect, before it counts as failed.
const MAX_RETRIES: u32 = 5;
/// Pause before the first reconnect; doubled for each further one.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Connects opened between two polls.
const OPEN_BATCH: usize = 64;
/// How often server and generator CPU are sampled during the storm.
const CPU_SAMPLE: Duration = Duration::from_millis(50);
/// Bytes read at once.
const CHUNK: usize = 64 * 1024;

/// What one storm run measured.
#[derive(Clone, Debug, Default)]
pub struct StormOutcome {
    pub clients: usize,
    pub greeted: usize,
    /// Reconnects after a refused, reset or closed connect.
    pub retries: u64,
    /// Clients that never got their greeting within `MAX_RETRIES` reconnects.
    pub failed: usize,
    /// Clients the server closed after greeting them.
    pub dropped: usize,
    /// Clients never greeted whose connect had not completed at the end (their SYNs were
    /// dropped), and those connected as far as they know (the server never accepted them).
    pub still_connecting: usize,
    pub waiting: usize,
    /// From the first connect to the last greeting; `None` if not everyone was greeted.
    pub all_greeted_s: Option<f64>,
    /// Per client, from its first connect to its greeting, in µs: p50, p99, p99.9, max.
    pub greeting_us: [u64; 4],
    /// Presence lines (`* … joined`, `* … left`) received by storm and room clients together.
    pub presence_lines: u64,
    pub presence_bytes: u64,
    /// Whether presence lines stopped coming (for `SETTLE`) before the deadline.
    pub settled: bool,
    /// From the first connect to the last client's first connect: how fast the generator opened.
    pub opening_s: f64,
    /// From the first connect to the last greeting or presence line, whichever came later.
    pub storm_s: f64,
    /// Server CPU seconds from the first connect to the end of the storm (`storm_s`, to the
    /// next CPU sample).
    pub server_cpu: f64,
    /// This process (storm and room threads) over the same interval.
    pub generator_cpu: f64,
    pub peak_rss_kib: u64,
    pub room: RoomOutcome,
}

impl StormOutcome {
    /// Every client greeted, none lost, presence settled, the room's chat complete and in order.
    pub fn complete(&self) -> bool {
        self.greeted == self.clients
            && self.failed == 0
            && self.dropped == 0
            && self.settled
            && self.room.complete()
    }

    /// Seconds until every client was greeted; infinite if some never were.
    pub fn all_greeted_or_inf(&self) -> f64 {
        self.all_greeted_s.unwrap_or(f64::INFINITY)
    }

    pub fn presence_megabytes(&self) -> f64 {
        self.presence_bytes as f64 / 1e6
    }

    /// What went wrong, for `NO: …`.
    pub fn problems(&self) -> String {
        let mut problems = Vec::new();
        if self.greeted < self.clients {
            problems.push(format!(
                "{} of {} greeted ({} still connecting, {} connected and waiting)",
                self.greeted, self.clients, self.still_connecting, self.waiting
            ));
        }
        if self.failed > 0 {
            problems.push(format!("{} gave up reconnecting", self.failed));
        }
        if self.dropped > 0 {
            problems.push(format!("{} closed by the server", self.dropped));
        }
        if !self.settled && self.greeted == self.clients {
            problems.push("presence lines still coming at the deadline".into());
        }
        let room = &self.room;
        if room.received < room.expected {
            problems.push(format!(
                "room got {} of {} lines",
                room.received, room.expected
            ));
        }
        if room.out_of_order > 0 {
            problems.push(format!("room: {} out of order", room.out_of_order));
        }
        problems.join(", ")
    }
}

/// What the chatting room measured.
#[derive(Clone, Debug, Default)]
pub struct RoomOutcome {
    pub members: usize,
    /// Lines sent by all members together.
    pub sent: u64,
    /// Deliveries to other members: every member should get every other member's lines.
    pub expected: u64,
    pub received: u64,
    pub out_of_order: u64,
    /// Latency of lines sent during the storm, in µs: p50, p99, p99.9, max.
    pub latency_us: [u64; 4],
    /// How many deliveries those latencies come from.
    pub latency_samples: u64,
    /// The same for lines sent in the calm before the storm.
    pub calm_latency_us: [u64; 4],
    pub calm_samples: u64,
}

impl RoomOutcome {
    pub fn complete(&self) -> bool {
        self.received == self.expected && self.out_of_order == 0
    }
}

/// Runs one storm of `clients` against `server`, which should be fresh, and stops it when
/// done (before the clients close, so a server is not measured reaping them).
/// `room_interval` is the pause between two lines of one room member (zero: the room is
/// silent). `silent` storm clients send nothing; otherwise a peerchat client sends an empty
/// line (which the server ignores) once connected, as a Redis client sends its `SUBSCRIBE`.
pub fn run(
    server: ServerProcess,
    clients: usize,
    room_interval: Duration,
    silent: bool,
) -> StormOutcome {
    let kind = server.kind;
    let base = Instant::now();
    let shared = Arc::new(RoomShared {
        base,
        storm_started_ns: AtomicU64::new(u64::MAX),
        storm_ended_ns: AtomicU64::new(u64::MAX),
        stop_sending: AtomicBool::new(false),
        done: AtomicBool::new(false),
    });
    let room = Room::join(kind, server.addr, ROOM_MEMBERS);
    let room_thread = {
        let shared = shared.clone();
        thread::spawn(move || room.chat(room_interval, &shared))
    };
    thread::sleep(WARM_UP);

    let mut storm = Storm::new(kind, server.addr, clients, base, silent);
    let before = (server.cpu_seconds(), own_cpu_seconds());
    shared
        .storm_started_ns
        .store(base.elapsed().as_nanos() as u64, Ordering::Release);
    let ended = storm.run(&server, before);
    shared
        .storm_ended_ns
        .store(ended.as_nanos() as u64, Ordering::Release);
    // The room stops sending; both keep reading until its last lines are in (which also
    // brings in any presence line still on its way to the room).
    shared.stop_sending.store(true, Ordering::Release);
    storm.drain_until(|| shared.done.load(Ordering::Acquire), ROOM_DRAIN * 2);
    let (room, room_presence, members) = room_thread.join().expect("room thread");

    let peak_rss_kib = server.memory_kib("VmHWM");
    // Stop the server before any client goes, so no `left` line is counted and no server
    // spends time on clients leaving.
    drop(server);
    drop(members);
    let mut outcome = storm.outcome();
    outcome.presence_bytes += room_presence.bytes;
    outcome.presence_lines += room_presence.lines;
    outcome.peak_rss_kib = peak_rss_kib;
    outcome.room = room;
    outcome
}

// ---------------------------------------------------------------------------------------------
// Lines: greetings, presence, room chat

/// Presence lines counted, in lines and bytes (line ends included).
#[derive(Clone, Copy, Debug, Default)]
pub struct Presence {
    pub lines: u64,
    pub bytes: u64,
}

/// `* … joined` or `* … left`, as peerchat words a client's arrival and departure (one name
/// or several coalesced into one line).
fn is_presence(line: &[u8]) -> bool {
    let text = trim_line_end(line);
    text.starts_with(b"* ") && (text.ends_with(b" joined") || text.ends_with(b" left"))
}

/// The line that greets a client: peerchat's welcome notice, or the Redis `subscribe` reply
/// (its middle line: `*3`, `$9`, `subscribe`, `$4`, `chat`, `:1`).
fn is_greeting(kind: Kind, line: &[u8]) -> bool {
    match kind {
        Kind::Peerchat => line.starts_with(b"* welcome, you are "),
        Kind::Redis => trim_line_end(line) == b"subscribe",
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Calls `each` for every whole line in `bytes` (line end included); returns the bytes used.
fn for_each_line(bytes: &[u8], mut each: impl FnMut(&[u8])) -> usize {
    let mut at = 0;
    while let Some(end) = bytes[at..].iter().position(|&b| b == b'\n') {
        each(&bytes[at..at + end + 1]);
        at += end + 1;
    }
    at
}

/// Reads `socket` until it would block, handing each chunk (after `partial`, the unfinished
/// line of the last read) to `lines`, which returns the bytes it used. `Err` when the
/// connection is over: `None` for end of stream, `Some` for an error.
fn read_lines(
    socket: &mut impl Read,
    partial: &mut Vec<u8>,
    chunk: &mut [u8],
    mut lines: impl FnMut(&[u8]) -> usize,
) -> Result<(), Option<std::io::Error>> {
    loop {
        let kept = partial.len();
        chunk[..kept].copy_from_slice(partial);
        let read = match socket.read(&mut chunk[kept..]) {
            Ok(0) => return Err(None),
            Ok(n) => n,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(err) => return Err(Some(err)),
        };
        let used = lines(&chunk[..kept + read]);
        partial.clear();
        partial.extend_from_slice(&chunk[used..kept + read]);
        if partial.len() > chunk.len() / 2 {
            partial.clear(); // no line is this long; never let it grow
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The storm

/// One reconnecting client.
struct Client {
    socket: Option<TcpStream>,
    /// When its first connect was made, since `Storm::base`.
    first_connect: Duration,
    reconnects: u32,
    /// `Storm::hello` written.
    said_hello: bool,
    greeted: bool,
    /// Gave up (too many reconnects) or closed by the server after its greeting.
    gone: bool,
    partial: Vec<u8>,
}

struct Storm {
    kind: Kind,
    /// What a client sends as soon as it is connected.
    hello: &'static [u8],
    addr: SocketAddr,
    base: Instant,
    poll: Poll,
    events: Events,
    clients: Vec<Client>,
    chunk: Vec<u8>,
    /// Reconnects due: (when, client).
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    opened: usize,
    first_connect: Instant,
    greetings: Histogram,
    greeted: usize,
    retries: u64,
    failed: usize,
    dropped: usize,
    last_greeting: Option<Instant>,
    presence: Presence,
    last_presence: Option<Instant>,
    settled: bool,
    /// When the last client's first connect was made.
    last_opened: Option<Instant>,
    /// When the storm ended: its last greeting or presence line, as of settling or the deadline.
    ended: Option<Instant>,
    /// CPU (server, generator) at the first connect and at the sample after the storm's end.
    cpu_before: (f64, f64),
    cpu_after: (f64, f64),
}

impl Storm {
    fn new(kind: Kind, addr: SocketAddr, clients: usize, base: Instant, silent: bool) -> Storm {
        Storm {
            kind,
            hello: match kind {
                Kind::Redis => b"SUBSCRIBE chat\r\n",
                Kind::Peerchat if silent => b"",
                Kind::Peerchat => b"\n",
            },
            addr,
            base,
            poll: Poll::new().expect("poll"),
            events: Events::with_capacity(4096),
            clients: (0..clients)
                .map(|_| Client {
                    socket: None,
                    first_connect: Duration::ZERO,
                    reconnects: 0,
                    said_hello: false,
                    greeted: false,
                    gone: false,
                    partial: Vec::new(),
                })
                .collect(),
            chunk: vec![0; CHUNK],
            due: BinaryHeap::new(),
            opened: 0,
            first_connect: Instant::now(),
            greetings: Histogram::default(),
            greeted: 0,
            retries: 0,
            failed: 0,
            dropped: 0,
            last_greeting: None,
            presence: Presence::default(),
            last_presence: None,
            settled: false,
            last_opened: None,
            ended: None,
            cpu_before: (0.0, 0.0),
            cpu_after: (0.0, 0.0),
        }
    }

    /// Opens every client and reads until all are greeted and presence has settled, or the
    /// deadline. Returns when the storm ended (its last greeting or presence line), since
    /// `base`.
    fn run(&mut self, server: &ServerProcess, cpu_before: (f64, f64)) -> Duration {
        self.cpu_before = cpu_before;
        self.cpu_after = cpu_before;
        self.first_connect = Instant::now();
        let deadline = self.first_connect + DEADLINE;
        let mut next_sample = self.first_connect + CPU_SAMPLE;
        let mut active_since_sample = true;
        loop {
            let now = Instant::now();
            for _ in 0..OPEN_BATCH {
                if self.opened == self.clients.len() {
                    break;
                }
                self.clients[self.opened].first_connect = now - self.base;
                self.connect(self.opened);
                self.opened += 1;
                if self.opened == self.clients.len() {
                    self.last_opened = Some(Instant::now());
                }
            }
            self.reconnect_due(now);

            let timeout = if self.opened < self.clients.len() {
                Duration::ZERO
            } else {
                let retry = self
                    .due
                    .peek()
                    .map(|Reverse((when, _))| when.saturating_duration_since(now));
                retry.unwrap_or(CPU_SAMPLE).min(CPU_SAMPLE)
            };
            let (greeted, presence) = (self.greeted, self.presence.lines);
            self.poll_once(timeout);
            active_since_sample |= self.greeted != greeted || self.presence.lines != presence;

            let now = Instant::now();
            if now >= next_sample {
                // CPU at the first sample after the last greeting or presence line.
                if active_since_sample {
                    self.cpu_after = (server.cpu_seconds(), own_cpu_seconds());
                    active_since_sample = false;
                }
                next_sample = now + CPU_SAMPLE;
            }
            let resolved = self.greeted + self.failed == self.clients.len();
            if resolved && now.duration_since(self.last_event()) >= SETTLE {
                self.settled = true;
                break;
            }
            if now >= deadline {
                break;
            }
        }
        if active_since_sample {
            self.cpu_after = (server.cpu_seconds(), own_cpu_seconds());
        }
        let ended = self.last_event();
        self.ended = Some(ended);
        ended - self.base
    }

    /// The last greeting or presence line, or the first connect if neither came.
    fn last_event(&self) -> Instant {
        [self.last_greeting, self.last_presence]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(self.first_connect)
    }

    /// Keeps every client read until `done` or `limit`.
    fn drain_until(&mut self, done: impl Fn() -> bool, limit: Duration) {
        let until = Instant::now() + limit;
        while !done() && Instant::now() < until {
            self.poll_once(Duration::from_millis(10));
        }
    }

    fn poll_once(&mut self, timeout: Duration) {
        if let Err(err) = self.poll.poll(&mut self.events, Some(timeout)) {
            if err.kind() != ErrorKind::Interrupted {
                panic!("storm poll: {err}");
            }
        }
        let ready: Vec<(usize, bool)> = self
            .events
            .iter()
            .map(|event| (event.token().0, event.is_writable()))
            .collect();
        for (index, writable) in ready {
            self.on_ready(index, writable);
        }
    }

    /// Starts a nonblocking connect for client `index`; a connect that fails at once is
    /// retried like one refused later.
    fn connect(&mut self, index: usize) {
        let registry: &Registry = self.poll.registry();
        let client = &mut self.clients[index];
        client.said_hello = false;
        client.partial.clear();
        match TcpStream::connect(self.addr) {
            Ok(mut socket) => {
                registry
                    .register(
                        &mut socket,
                        Token(index),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .expect("register a storm client");
                client.socket = Some(socket);
            }
            Err(_) => self.lost(index),
        }
    }

    fn reconnect_due(&mut self, now: Instant) {
        while let Some(&Reverse((when, index))) = self.due.peek() {
            if when > now {
                break;
            }
            self.due.pop();
            self.connect(index);
        }
    }

    /// The connection of client `index` is over: reconnect later if it was not yet greeted.
    fn lost(&mut self, index: usize) {
        let client = &mut self.clients[index];
        if let Some(mut socket) = client.socket.take() {
            let _ = self.poll.registry().deregister(&mut socket);
        }
        if client.gone {
            return;
        }
        if client.greeted {
            client.gone = true;
            self.dropped += 1;
        } else if client.reconnects >= MAX_RETRIES {
            client.gone = true;
            self.failed += 1;
        } else {
            let pause = RETRY_PAUSE * 2u32.pow(client.reconnects);
            client.reconnects += 1;
            self.retries += 1;
            self.due.push(Reverse((Instant::now() + pause, index)));
        }
    }

    fn on_ready(&mut self, index: usize, writable: bool) {
        let kind = self.kind;
        let client = &mut self.clients[index];
        let Some(socket) = client.socket.as_mut() else {
            return; // an event from a socket closed earlier in this batch
        };
        if !client.greeted {
            if let Ok(Some(_)) | Err(_) = socket.take_error() {
                return self.lost(index);
            }
        }
        if writable && !client.said_hello && !self.hello.is_empty() {
            match socket.write(self.hello) {
                Ok(n) if n == self.hello.len() => client.said_hello = true,
                Ok(_) => return self.lost(index), // a fresh socket takes a few bytes or none
                Err(err)
                    if matches!(
                        err.kind(),
                        ErrorKind::WouldBlock | ErrorKind::NotConnected | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return self.lost(index),
            }
        }
        let now = Instant::now();
        let since_base = now - self.base;
        let mut greeted_now = false;
        let mut presence = Presence::default();
        let greeted_before = client.greeted;
        let read = read_lines(socket, &mut client.partial, &mut self.chunk, |bytes| {
            for_each_line(bytes, |line| {
                if !greeted_before && !greeted_now && is_greeting(kind, line) {
                    greeted_now = true;
                } else if kind == Kind::Peerchat && is_presence(line) {
                    presence.lines += 1;
                    presence.bytes += line.len() as u64;
                }
            })
        });
        if greeted_now {
            client.greeted = true;
            self.greeted += 1;
            self.last_greeting = Some(now);
            let waited = since_base.saturating_sub(client.first_connect);
            self.greetings.record(waited.as_micros() as u64);
        }
        if presence.lines > 0 {
            self.presence.lines += presence.lines;
            self.presence.bytes += presence.bytes;
            self.last_presence = Some(now);
        }
        if read.is_err() {
            self.lost(index);
        }
    }

    /// Clients with a socket and no greeting whose connect has (`true`) or has not completed.
    fn waiting(&self, connected: bool) -> usize {
        self.clients
            .iter()
            .filter_map(|c| c.socket.as_ref().filter(|_| !c.greeted))
            .filter(|socket| socket.peer_addr().is_ok() == connected)
            .count()
    }

    fn outcome(&self) -> StormOutcome {
        let all_greeted = self.greeted == self.clients.len();
        StormOutcome {
            clients: self.clients.len(),
            greeted: self.greeted,
            retries: self.retries,
            failed: self.failed,
            dropped: self.dropped,
            still_connecting: self.waiting(false),
            waiting: self.waiting(true),
            all_greeted_s: match (all_greeted, self.last_greeting) {
                (true, Some(last)) => Some((last - self.first_connect).as_secs_f64()),
                _ => None,
            },
            greeting_us: self.greetings.percentiles(),
            presence_lines: self.presence.lines,
            presence_bytes: self.presence.bytes,
            settled: self.settled,
            opening_s: self
                .last_opened
                .map_or(f64::NAN, |last| (last - self.first_connect).as_secs_f64()),
            storm_s: (self.ended.unwrap_or_else(|| self.last_event()) - self.first_connect)
                .as_secs_f64(),
            server_cpu: self.cpu_after.0 - self.cpu_before.0,
            generator_cpu: self.cpu_after.1 - self.cpu_before.1,
            peak_rss_kib: 0,
            room: RoomOutcome::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The room

/// What the storm thread and the room thread share.
struct RoomShared {
    /// Timestamps in room lines are nanoseconds since this instant.
    base: Instant,
    /// When the first storm client connected (`u64::MAX` until then), since `base`.
    storm_started_ns: AtomicU64,
    /// When the storm's last greeting or presence line came (`u64::MAX` until known).
    storm_ended_ns: AtomicU64,
    stop_sending: AtomicBool,
    /// Set by the room thread when it has everything or gave up waiting.
    done: AtomicBool,
}

/// One room member: peerchat's one connection, or Redis's subscriber and publisher.
struct Member {
    reader: TcpStream,
    /// Redis only: the connection that publishes (a subscribed one cannot).
    publisher: Option<TcpStream>,
    partial: Vec<u8>,
    /// Next sequence number expected from each member.
    next_seq: Vec<u64>,
    /// Lines this member has sent.
    sent: u64,
}

struct Room {
    kind: Kind,
    members: Vec<Member>,
}

impl Room {
    /// Connects `count` members, one after the other, each greeted before the next comes, so
    /// each is in the room before anyone sends.
    fn join(kind: Kind, addr: SocketAddr, count: usize) -> Room {
        let members = (0..count)
            .map(|_| {
                let mut reader = StdStream::connect(addr).expect("connect a room member");
                let publisher = (kind == Kind::Redis).then(|| {
                    reader.write_all(b"SUBSCRIBE chat\r\n").unwrap();
                    let publisher = StdStream::connect(addr).expect("connect a room publisher");
                    publisher.set_nodelay(true).unwrap();
                    publisher.set_nonblocking(true).unwrap();
                    TcpStream::from_std(publisher)
                });
                reader.set_nodelay(true).unwrap();
                wait_for_greeting(kind, &mut reader);
                reader.set_nonblocking(true).unwrap();
                Member {
                    reader: TcpStream::from_std(reader),
                    publisher,
                    partial: Vec::new(),
                    next_seq: vec![0; count],
                    sent: 0,
                }
            })
            .collect();
        Room { kind, members }
    }

    /// Each member sends a line every `interval` (members staggered evenly) until
    /// `stop_sending`, then everyone reads until every line is in or `ROOM_DRAIN` passes.
    /// Returns what the room measured, the presence lines it got during the storm, and its
    /// members, still connected.
    fn chat(mut self, interval: Duration, shared: &RoomShared) -> (RoomOutcome, Presence, Room) {
        let mut poll = Poll::new().expect("room poll");
        for (index, member) in self.members.iter_mut().enumerate() {
            poll.registry()
                .register(&mut member.reader, Token(2 * index), Interest::READABLE)
                .unwrap();
            if let Some(publisher) = member.publisher.as_mut() {
                poll.registry()
                    .register(publisher, Token(2 * index + 1), Interest::READABLE)
                    .unwrap();
            }
        }
        let count = self.members.len() as u32;
        let started = Instant::now();
        let due = |member: usize, seq: u64| {
            started + interval * seq as u32 + interval * member as u32 / count
        };
        let mut events = Events::with_capacity(256);
        let mut chunk = vec![0u8; CHUNK];
        let mut latencies: Vec<(u64, u64)> = Vec::new(); // (sent at, µs)
        let mut presence = Presence::default();
        let mut out_of_order = 0;
        let mut drain_until = None;
        let mut line = Vec::new();
        loop {
            let now = Instant::now();
            if drain_until.is_none() && shared.stop_sending.load(Ordering::Acquire) {
                drain_until = Some(now + ROOM_DRAIN);
            }
            let mut next_due = now + Duration::from_millis(10);
            if drain_until.is_none() && !interval.is_zero() {
                for index in 0..self.members.len() {
                    while due(index, self.members[index].sent) <= now {
                        let sent_at = shared.base.elapsed().as_nanos() as u64;
                        self.send(index, sent_at, &mut line);
                    }
                    next_due = next_due.min(due(index, self.members[index].sent));
                }
            }
            if let Some(until) = drain_until {
                if self.all_received() || now >= until {
                    break;
                }
            }
            let timeout = next_due.saturating_duration_since(Instant::now());
            poll.poll(&mut events, Some(timeout))
                .or_else(|err| match err.kind() {
                    ErrorKind::Interrupted => Ok(()),
                    _ => Err(err),
                })
                .expect("room poll");
            let storm_started = shared.storm_started_ns.load(Ordering::Acquire);
            for event in events.iter() {
                let index = event.token().0 / 2;
                let kind = self.kind;
                let member = &mut self.members[index];
                if event.token().0 % 2 == 1 {
                    // PUBLISH replies (`:N`): read and forget.
                    let publisher = member.publisher.as_mut().unwrap();
                    while matches!(publisher.read(&mut chunk), Ok(n) if n > 0) {}
                    continue;
                }
                let next_seq = &mut member.next_seq;
                let result = read_lines(
                    &mut member.reader,
                    &mut member.partial,
                    &mut chunk,
                    |bytes| {
                        let now = shared.base.elapsed().as_nanos() as u64;
                        for_each_line(bytes, |line| {
                            if let Some((from, seq, sent_at)) = room_line(line) {
                                if from == index || from >= next_seq.len() {
                                    return; // Redis echoes a member's own lines
                                }
                                if seq != next_seq[from] {
                                    out_of_order += 1;
                                }
                                next_seq[from] = seq + 1;
                                latencies.push((sent_at, now.saturating_sub(sent_at) / 1000));
                            } else if kind == Kind::Peerchat
                                && now >= storm_started
                                && is_presence(line)
                            {
                                presence.lines += 1;
                                presence.bytes += line.len() as u64;
                            }
                        })
                    },
                );
                if let Err(err) = result {
                    eprintln!("room member {index} lost its connection: {err:?}");
                }
            }
        }
        shared.done.store(true, Ordering::Release);

        // Latency of the lines sent while the storm lasted, and before it.
        let storm_started = shared.storm_started_ns.load(Ordering::Acquire);
        let storm_ended = shared.storm_ended_ns.load(Ordering::Acquire);
        let (mut storm, mut calm) = (Histogram::default(), Histogram::default());
        let (mut samples, mut calm_samples) = (0, 0);
        for &(sent_at, micros) in &latencies {
            if sent_at < storm_started {
                calm.record(micros);
                calm_samples += 1;
            } else if sent_at <= storm_ended {
                storm.record(micros);
                samples += 1;
            }
        }
        let sent: Vec<u64> = self.members.iter().map(|m| m.sent).collect();
        let total_sent: u64 = sent.iter().sum();
        let others = self.members.len() as u64 - 1;
        let received = self
            .members
            .iter()
            .enumerate()
            .map(|(index, member)| {
                (0..sent.len())
                    .filter(|&from| from != index)
                    .map(|from| member.next_seq[from].min(sent[from]))
                    .sum::<u64>()
            })
            .sum();
        let outcome = RoomOutcome {
            members: self.members.len(),
            sent: total_sent,
            expected: total_sent * others,
            received,
            out_of_order,
            latency_us: storm.percentiles(),
            latency_samples: samples,
            calm_latency_us: calm.percentiles(),
            calm_samples,
        };
        (outcome, presence, self)
    }

    /// Sends member `index`'s next line: `rINDEX SEQ TIME`.
    fn send(&mut self, index: usize, sent_at: u64, line: &mut Vec<u8>) {
        let member = &mut self.members[index];
        let text = format!("r{index} {:010} {sent_at:020}", member.sent);
        line.clear();
        let socket = match member.publisher.as_mut() {
            Some(publisher) => {
                write!(
                    line,
                    "*3\r\n$7\r\nPUBLISH\r\n$4\r\nchat\r\n${}\r\n{text}\r\n",
                    text.len()
                )
                .unwrap();
                publisher
            }
            None => {
                line.extend_from_slice(text.as_bytes());
                line.push(b'\n');
                &mut member.reader
            }
        };
        write_fully(socket, line);
        member.sent += 1;
    }

    fn all_received(&self) -> bool {
        self.members.iter().enumerate().all(|(index, member)| {
            self.members
                .iter()
                .enumerate()
                .all(|(from, other)| from == index || member.next_seq[from] >= other.sent)
        })
    }
}

/// Writes all of `bytes` to a nonblocking socket, waiting briefly when it is full (a room line
/// is small; the socket is full only if the server stopped reading).
fn write_fully(socket: &mut TcpStream, mut bytes: &[u8]) {
    let until = Instant::now() + DEADLINE;
    while !bytes.is_empty() {
        match socket.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) if err.kind() == ErrorKind::WouldBlock && Instant::now() < until => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(err) => super::fail(&format!("room member cannot send: {err}")),
        }
    }
}

/// Reads from a blocking connection until its greeting line, within 10 s.
fn wait_for_greeting(kind: Kind, socket: &mut StdStream) {
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = socket
            .read(&mut buf)
            .unwrap_or_else(|err| super::die(&format!("room member not greeted: {err}")));
        if n == 0 {
            super::die("room member closed before its greeting");
        }
        seen.extend_from_slice(&buf[..n]);
        let mut greeted = false;
        for_each_line(&seen, |line| greeted |= is_greeting(kind, line));
        if greeted {
            break;
        }
    }
    socket.set_read_timeout(None).unwrap();
}

/// A room line as it arrives: `rI SEQ TIME`, after peerchat's `<nick> ` or on its own line
/// (the payload line of a Redis message). Returns (member, sequence number, send time).
fn room_line(line: &[u8]) -> Option<(usize, u64, u64)> {
    let text = trim_line_end(line);
    let text = match text.first() {
        Some(b'<') => {
            let end = text.windows(2).position(|w| w == b"> ")?;
            &text[end + 2..]
        }
        _ => text,
    };
    let rest = text.strip_prefix(b"r")?;
    let mut fields = rest.split(|&b| b == b' ');
    let member = number(fields.next()?)?;
    let seq = number(fields.next()?)?;
    let sent_at = number(fields.next()?)?;
    fields
        .next()
        .is_none()
        .then_some((member as usize, seq, sent_at))
}

fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

//! The load generator: N receivers and P senders against one server, peerchat or Redis, with
//! the same sockets, threads, pacing and counting for both.
//!
//! Senders write from one thread with plain blocking sockets; each sender keeps at most
//! `window` messages in flight (sent but not yet delivered everywhere, on average), writing what
//! the window allows in one `write`, as a real client would. Receivers are spread over a few
//! mio threads. Every message carries its sender, a sequence number and its send time, so the
//! receivers check per-sender order and completeness and measure latency.
//!
//! A server started over TLS (`ServerProcess::tls`) gets the same load over TLS: every
//! connection does its handshake first (blocking), senders encrypt each batch once, and the
//! receiving threads read ciphertext in large chunks and decrypt it with rustls. That
//! decryption is generator CPU on the same machine, the same for both servers.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream as StdStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::servers::{Kind, ServerProcess};
use super::stats::{own_cpu_seconds, Histogram};
use super::tls::{self, Session};

/// A run that makes no progress for this long is declared stuck.
const STALL: Duration = Duration::from_secs(10);
/// Bytes a receiving thread reads at once.
const CHUNK: usize = 256 * 1024;
/// Send time (ns since the run began) and sequence number take this many bytes of a message.
const HEADER: usize = 32;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub receivers: usize,
    pub senders: usize,
    /// Bytes of chat text (peerchat) or of the PUBLISH payload (Redis).
    pub size: usize,
    pub messages_per_sender: u64,
    /// Messages each sender may have in flight.
    pub window: u64,
    /// Messages per second over all senders; `None` is as fast as the window allows.
    pub rate: Option<f64>,
    /// Threads reading the receivers.
    pub receive_threads: usize,
}

impl Scenario {
    pub fn label(&self) -> String {
        format!(
            "n={} p={} s={} w={}",
            self.receivers, self.senders, self.size, self.window
        )
    }

    fn expected(&self) -> u64 {
        self.receivers as u64 * self.senders as u64 * self.messages_per_sender
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub delivered: u64,
    pub expected: u64,
    pub out_of_order: u64,
    /// `! … not saved` lines the senders got (peerchat with persistence on).
    pub not_saved: u64,
    pub seconds: f64,
    pub server_cpu: f64,
    pub generator_cpu: f64,
    pub peak_rss_kib: u64,
    /// p50, p99, p99.9, max in µs.
    pub latency_us: [u64; 4],
    /// Bytes each delivery took on the wire, for MB/s (plaintext: TLS framing not counted).
    pub wire_bytes: usize,
    /// The TLS cipher suite the connections agreed on; `None` over plain TCP.
    pub tls_suite: Option<String>,
    /// What the receivers' sockets carried.
    pub received: Received,
}

/// What the receivers (not the senders) read, over the whole run, handshakes included.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// `read` calls that returned bytes.
    pub reads: u64,
    /// Bytes read from the sockets: TLS records over TLS.
    pub wire_bytes: u64,
    /// Bytes of text the frames were cut from: the same as `wire_bytes` over plain TCP.
    pub text_bytes: u64,
}

impl Received {
    fn add(&mut self, other: &Received) {
        self.reads += other.reads;
        self.wire_bytes += other.wire_bytes;
        self.text_bytes += other.text_bytes;
    }
}

/// What TLS 1.3 adds to each record with an AEAD cipher (AES-GCM, ChaCha20-Poly1305): a 5-byte
/// header, the 1-byte inner content type and a 16-byte tag.
const TLS13_RECORD_OVERHEAD: u64 = 5 + 1 + 16;

impl Outcome {
    pub fn complete(&self) -> bool {
        self.delivered == self.expected && self.out_of_order == 0
    }

    pub fn delivered_per_sec(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }

    pub fn megabytes_per_sec(&self) -> f64 {
        self.delivered_per_sec() * self.wire_bytes as f64 / 1e6
    }

    pub fn delivered_per_cpu_sec(&self) -> f64 {
        self.delivered as f64 / self.server_cpu.max(0.01)
    }

    /// Deliveries per socket `read` of a receiver: how much the server gathers per write.
    pub fn delivered_per_read(&self) -> f64 {
        self.delivered as f64 / self.received.reads.max(1) as f64
    }

    /// Over TLS, deliveries per TLS record, estimated from what the records added to the
    /// text (handshakes and session tickets make it slightly low); `None` over plain TCP.
    pub fn delivered_per_record(&self) -> Option<f64> {
        self.tls_suite.as_ref()?;
        let added = self
            .received
            .wire_bytes
            .saturating_sub(self.received.text_bytes);
        let records = (added / TLS13_RECORD_OVERHEAD).max(1);
        Some(self.delivered as f64 / records as f64)
    }

    /// Which side was short of CPU: the single-threaded server (busy ≥ 90% of a core), the
    /// generator, or both sharing the machine's cores.
    pub fn limit(&self) -> &'static str {
        let server = self.server_cpu / self.seconds;
        let generator = self.generator_cpu / self.seconds;
        let cores = thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        if server >= 0.9 {
            "server"
        } else if generator >= 0.9 || server + generator >= 0.9 * cores {
            "GENERATOR?"
        } else {
            "neither"
        }
    }
}

/// Runs `scenario` against `server`.
pub fn run(server: &ServerProcess, scenario: &Scenario) -> Outcome {
    let kind = server.kind;
    // Receivers first: a peerchat receiver must be in the room to see the senders' renames.
    let receivers = connect_receivers(server, scenario.receivers);
    let mut senders = connect_senders(server, scenario.senders);
    let tls_suite = receivers
        .first()
        .and_then(|link| link.tls.as_ref())
        .map(tls::cipher_suite);
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        not_saved: AtomicU64::new(0),
        not_ready: AtomicUsize::new(scenario.receivers),
        done: AtomicBool::new(false),
        sending_thread: thread::current(),
        base: Instant::now(),
    });
    let sender_inputs = senders.iter().map(Link::try_clone).collect();
    let readers = spawn_readers(kind, scenario, receivers, sender_inputs, &shared);
    wait_until_ready(&shared);

    let cpu_before = (server.cpu_seconds(), own_cpu_seconds());
    let started = Instant::now();
    send_all(kind, &mut senders, scenario, &shared);
    let delivered = wait_for_deliveries(&shared.delivered, scenario.expected());
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds() - cpu_before.0;
    let generator_cpu = own_cpu_seconds() - cpu_before.1;

    // Let late `! not saved` reports arrive before counting them.
    thread::sleep(Duration::from_millis(200));
    shared.done.store(true, Ordering::Release);
    let mut total = Tally::default();
    for reader in readers {
        let part = reader.join().expect("receiving thread");
        total.histogram.merge(&part.histogram);
        total.out_of_order += part.out_of_order;
        total.received.add(&part.received);
    }
    Outcome {
        delivered,
        expected: scenario.expected(),
        out_of_order: total.out_of_order,
        not_saved: shared.not_saved.load(Ordering::Acquire),
        seconds,
        server_cpu,
        generator_cpu,
        peak_rss_kib: server.memory_kib("VmHWM"),
        latency_us: total.histogram.percentiles(),
        wire_bytes: delivery_frame_len(kind, scenario.size, 1),
        tls_suite,
        received: total.received,
    }
}

/// State the sending and receiving threads share.
struct Shared {
    delivered: AtomicU64,
    not_saved: AtomicU64,
    /// Receivers not yet subscribed (Redis) or not yet aware of every sender's nick (peerchat).
    not_ready: AtomicUsize,
    done: AtomicBool,
    /// Parked while its window is full; receivers unpark it when deliveries move.
    sending_thread: Thread,
    /// Timestamps in messages are nanoseconds since this instant.
    base: Instant,
}

/// One connection of the generator: the socket, and the TLS session over it when the server
/// is measured over TLS.
struct Link {
    socket: StdStream,
    tls: Option<Session>,
}

impl Link {
    /// Connects to `server`, TLS handshake included when it serves TLS.
    fn connect(server: &ServerProcess, what: &str) -> Link {
        let mut socket =
            StdStream::connect(server.addr).unwrap_or_else(|err| panic!("connect {what}: {err}"));
        let tls = server
            .tls
            .as_ref()
            .map(|config| tls::handshake(config, &mut socket));
        Link { socket, tls }
    }

    /// Writes all of `bytes`, encrypted first over TLS; `sealed` is scratch for the records.
    fn send(&mut self, bytes: &[u8], sealed: &mut Vec<u8>) {
        let wire = match &self.tls {
            None => bytes,
            Some(session) => {
                tls::seal(session, bytes, sealed);
                sealed
            }
        };
        write_fully(&mut self.socket, wire);
    }

    /// The same connection for a receiving thread to read (TLS: the same session).
    fn try_clone(&self) -> Link {
        Link {
            socket: self.socket.try_clone().expect("clone a sender socket"),
            tls: self.tls.clone(),
        }
    }
}

/// `write_all` that waits out `WouldBlock`: a receiving thread reads a sender's input through a
/// clone of its socket, and making that clone nonblocking made this one nonblocking too.
fn write_fully(socket: &mut StdStream, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match socket.write(bytes) {
            Ok(0) => panic!("send: the server closed the connection"),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(50))
            }
            Err(err) => panic!("send: {err}"),
        }
    }
}

fn connect_senders(server: &ServerProcess, count: usize) -> Vec<Link> {
    let mut sealed = Vec::new();
    (0..count)
        .map(|index| {
            let mut sender = Link::connect(server, "sender");
            sender.socket.set_nodelay(true).unwrap(); // no Nagle delay on a small final write
            if server.kind == Kind::Peerchat {
                // Receivers are ready once they have seen every sender take its name.
                sender.send(format!("/nick s{index}\n").as_bytes(), &mut sealed);
            }
            sender
        })
        .collect()
}

fn connect_receivers(server: &ServerProcess, count: usize) -> Vec<Link> {
    let mut sealed = Vec::new();
    (0..count)
        .map(|_| {
            let mut receiver = Link::connect(server, "receiver");
            if server.kind == Kind::Redis {
                receiver.send(b"SUBSCRIBE chat\r\n", &mut sealed);
            }
            receiver
        })
        .collect()
}

fn wait_until_ready(shared: &Shared) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.not_ready.load(Ordering::Acquire) > 0 {
        if Instant::now() > deadline {
            super::die("receivers were not ready within 60 s");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until everything is delivered or nothing moves for `STALL`; returns the count.
fn wait_for_deliveries(delivered: &AtomicU64, expected: u64) -> u64 {
    let mut last = (delivered.load(Ordering::Acquire), Instant::now());
    loop {
        let now = delivered.load(Ordering::Acquire);
        if now >= expected {
            return now;
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            eprintln!("stalled at {now} of {expected} deliveries");
            return now;
        }
        thread::sleep(Duration::from_micros(500));
    }
}

// ---------------------------------------------------------------------------------------------
// Sending

/// Sends every sender's messages within the window and, if set, the rate.
fn send_all(kind: Kind, senders: &mut [Link], scenario: &Scenario, shared: &Shared) {
    let per_delivery_round = (scenario.receivers * scenario.senders) as u64;
    let started = Instant::now();
    let mut batch = Vec::new();
    let mut sealed = Vec::new();
    let mut next_seq = 0u64;
    while next_seq < scenario.messages_per_sender {
        let delivered_rounds = shared.delivered.load(Ordering::Acquire) / per_delivery_round;
        let window_room = scenario.window.saturating_sub(next_seq - delivered_rounds);
        let rate_room = scenario.rate.map_or(u64::MAX, |rate| {
            let due = (started.elapsed().as_secs_f64() * rate / scenario.senders as f64) as u64;
            (due + 1).saturating_sub(next_seq)
        });
        let room = window_room
            .min(rate_room)
            .min(scenario.messages_per_sender - next_seq);
        if room == 0 {
            thread::park_timeout(Duration::from_micros(200));
            continue;
        }
        for (index, sender) in senders.iter_mut().enumerate() {
            batch.clear();
            let now = shared.base.elapsed().as_nanos() as u64;
            for seq in next_seq..next_seq + room {
                encode_message(kind, &mut batch, index, seq, now, scenario.size);
            }
            sender.send(&batch, &mut sealed);
        }
        next_seq += room;
    }
}

/// Appends one message as `kind`'s client sends it. The text is `SEQ TIME padding`, S bytes;
/// Redis has no nicknames, so there the payload starts with `sINDEX ` and pads less.
fn encode_message(kind: Kind, out: &mut Vec<u8>, sender: usize, seq: u64, now: u64, size: usize) {
    match kind {
        Kind::Peerchat => {
            write!(out, "{seq:010} {now:020} ").unwrap();
            out.resize(out.len() + size - HEADER, b'x');
            out.push(b'\n');
        }
        Kind::Redis => {
            write!(out, "*3\r\n$7\r\nPUBLISH\r\n$4\r\nchat\r\n${size}\r\n").unwrap();
            let tag = format!("s{sender} ");
            write!(out, "{tag}{seq:010} {now:020} ").unwrap();
            out.resize(out.len() + size - HEADER - tag.len(), b'x');
            out.extend_from_slice(b"\r\n");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// One socket a receiving thread reads.
struct Reader {
    socket: TcpStream,
    /// The TLS session over `socket`, if any.
    tls: Option<Session>,
    progress: Progress,
}

/// What a reader has seen of its stream so far.
struct Progress {
    /// The start of a frame that had not fully arrived at the last read.
    partial: Vec<u8>,
    /// Next sequence number expected from each sender; empty for a sender's own socket, whose
    /// input is only checked for `! not saved` reports.
    next_seq: Vec<u64>,
    /// Readiness signs still to come; see `Frame::Ready`.
    signs_missing: usize,
}

impl Progress {
    /// A receiver's stream, not a sender's input.
    fn is_receiver(&self) -> bool {
        !self.next_seq.is_empty()
    }
}

/// Starts the receiving threads; receivers are dealt round-robin, sender inputs go to the first.
fn spawn_readers(
    kind: Kind,
    scenario: &Scenario,
    receivers: Vec<Link>,
    sender_inputs: Vec<Link>,
    shared: &Arc<Shared>,
) -> Vec<thread::JoinHandle<Tally>> {
    let threads = scenario.receive_threads.clamp(1, scenario.receivers.max(1));
    let mut groups: Vec<Vec<(Link, bool)>> = (0..threads).map(|_| Vec::new()).collect();
    for (index, socket) in receivers.into_iter().enumerate() {
        groups[index % threads].push((socket, true));
    }
    groups[0].extend(sender_inputs.into_iter().map(|s| (s, false)));
    let frames = Frames::new(kind, scenario.size);
    groups
        .into_iter()
        .map(|group| {
            let shared = shared.clone();
            let frames = frames.clone();
            let senders = scenario.senders;
            thread::spawn(move || receive(group, senders, &frames, &shared))
        })
        .collect()
}

/// Reads its sockets until `done`; returns its latency histogram and order violations.
fn receive(links: Vec<(Link, bool)>, senders: usize, frames: &Frames, shared: &Shared) -> Tally {
    let mut poll = Poll::new().unwrap();
    let signs_needed = frames.readiness_signs(senders);
    let mut readers: Vec<Reader> = links
        .into_iter()
        .enumerate()
        .map(|(index, (link, is_receiver))| Reader {
            socket: register(&poll, link.socket, index),
            tls: link.tls,
            progress: Progress {
                partial: Vec::new(),
                next_seq: if is_receiver {
                    vec![0; senders]
                } else {
                    Vec::new()
                },
                signs_missing: if is_receiver { signs_needed } else { 0 },
            },
        })
        .collect();
    let mut tally = Tally::default();
    let mut buffers = Buffers {
        chunk: vec![0u8; CHUNK],
        raw: vec![0u8; CHUNK],
    };
    // A TLS handshake may have left text in the session that no readiness event will announce.
    for reader in &mut readers {
        read_all(reader, &mut buffers, frames, shared, &mut tally);
    }
    let mut events = Events::with_capacity(4096);
    while !shared.done.load(Ordering::Acquire) {
        poll.poll(&mut events, Some(Duration::from_millis(20)))
            .unwrap();
        for event in events.iter() {
            let reader = &mut readers[event.token().0];
            read_all(reader, &mut buffers, frames, shared, &mut tally);
        }
        if tally.delivered > 0 {
            shared
                .delivered
                .fetch_add(std::mem::take(&mut tally.delivered), Ordering::AcqRel);
            shared.sending_thread.unpark();
        }
        if tally.not_saved > 0 {
            shared
                .not_saved
                .fetch_add(std::mem::take(&mut tally.not_saved), Ordering::AcqRel);
        }
    }
    tally
}

/// What a receiving thread counted: deliveries and `! not saved` since it last reported, the
/// rest over the whole run.
#[derive(Default)]
struct Tally {
    delivered: u64,
    not_saved: u64,
    out_of_order: u64,
    histogram: Histogram,
    received: Received,
}

/// Makes `socket` nonblocking and registers it for reading under `token`.
fn register(poll: &Poll, socket: StdStream, token: usize) -> TcpStream {
    socket.set_nonblocking(true).unwrap();
    let mut socket = TcpStream::from_std(socket);
    poll.registry()
        .register(&mut socket, Token(token), Interest::READABLE)
        .unwrap();
    socket
}

/// A receiving thread's buffers.
struct Buffers {
    /// Text to cut frames from: a partial frame kept from the last read, then new bytes.
    chunk: Vec<u8>,
    /// Ciphertext read from a TLS socket, before decryption.
    raw: Vec<u8>,
}

/// Reads `reader` until it would block, handling every whole frame.
fn read_all(
    reader: &mut Reader,
    buffers: &mut Buffers,
    frames: &Frames,
    shared: &Shared,
    tally: &mut Tally,
) {
    let Reader {
        socket,
        tls,
        progress,
    } = reader;
    let Some(session) = tls else {
        take_in(
            progress,
            &mut buffers.chunk,
            socket,
            true,
            frames,
            shared,
            tally,
        );
        return;
    };
    let mut ciphertext = 0;
    loop {
        let chunk = &mut buffers.chunk;
        tls::open(session, &buffers.raw[..ciphertext], |plain| {
            take_in(progress, chunk, plain, false, frames, shared, tally)
        });
        ciphertext = match socket.read(&mut buffers.raw) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == ErrorKind::Interrupted => 0,
            Err(err) if err.kind() == ErrorKind::WouldBlock => return,
            Err(err) => panic!("receiver read: {err}"),
        };
        if progress.is_receiver() {
            tally.received.reads += 1;
            tally.received.wire_bytes += ciphertext as u64;
        }
    }
}

/// Reads `source` (a socket, or a TLS session's decrypted text) until it would block, handling
/// every whole frame. `from_socket`: `source` is the socket itself, so its reads count as
/// reads of the wire.
fn take_in(
    progress: &mut Progress,
    chunk: &mut [u8],
    source: &mut dyn Read,
    from_socket: bool,
    frames: &Frames,
    shared: &Shared,
    tally: &mut Tally,
) {
    loop {
        let kept = progress.partial.len();
        chunk[..kept].copy_from_slice(&progress.partial);
        let read = match source.read(&mut chunk[kept..]) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) if err.kind() == ErrorKind::WouldBlock => return,
            Err(err) => panic!("receiver read: {err}"),
        };
        if progress.is_receiver() {
            tally.received.text_bytes += read as u64;
            if from_socket {
                tally.received.reads += 1;
                tally.received.wire_bytes += read as u64;
            }
        }
        let now = shared.base.elapsed().as_nanos() as u64;
        let used = handle_frames(progress, &chunk[..kept + read], frames, now, shared, tally);
        progress.partial.clear();
        progress
            .partial
            .extend_from_slice(&chunk[used..kept + read]);
    }
}

/// Handles every whole frame in `bytes`; returns how many bytes they took.
fn handle_frames(
    reader: &mut Progress,
    bytes: &[u8],
    frames: &Frames,
    now: u64,
    shared: &Shared,
    tally: &mut Tally,
) -> usize {
    let mut at = 0;
    while let Some((frame, len)) = frames.next(&bytes[at..]) {
        at += len;
        match frame {
            Frame::Delivery {
                sender,
                seq,
                sent_at,
            } if !reader.next_seq.is_empty() => {
                if seq != reader.next_seq[sender] {
                    tally.out_of_order += 1;
                }
                reader.next_seq[sender] = seq + 1;
                tally.histogram.record(now.saturating_sub(sent_at) / 1000);
                tally.delivered += 1;
            }
            Frame::Ready if reader.signs_missing > 0 => {
                reader.signs_missing -= 1;
                if reader.signs_missing == 0 {
                    shared.not_ready.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Frame::NotSaved => tally.not_saved += 1,
            _ => {}
        }
    }
    at
}

/// What a frame from the server means to the generator.
enum Frame {
    Delivery {
        sender: usize,
        seq: u64,
        sent_at: u64,
    },
    /// A sign of readiness: a sender's rename seen (peerchat) or the subscription confirmed.
    Ready,
    NotSaved,
    Other,
}

/// Cuts frames out of the byte stream. Deliveries have a fixed shape, so the common case is a
/// prefix check and two fixed-width numbers; anything else is handled a line at a time.
#[derive(Clone)]
struct Frames {
    kind: Kind,
    size: usize,
    /// The bytes before the payload of a Redis pub/sub message.
    redis_header: Vec<u8>,
}

impl Frames {
    fn new(kind: Kind, size: usize) -> Frames {
        Frames {
            kind,
            size,
            redis_header: format!("*3\r\n$7\r\nmessage\r\n$4\r\nchat\r\n${size}\r\n").into_bytes(),
        }
    }

    /// The next whole frame and its length, or `None` if more bytes are needed.
    fn next(&self, bytes: &[u8]) -> Option<(Frame, usize)> {
        match self.kind {
            Kind::Peerchat => self.next_peerchat(bytes),
            Kind::Redis => self.next_redis(bytes),
        }
    }

    /// `<sI> SEQ TIME padding\r\n`, or any other line.
    fn next_peerchat(&self, bytes: &[u8]) -> Option<(Frame, usize)> {
        if let Some((sender, text_at)) = nick_prefix(bytes) {
            let end = text_at + self.size + 2;
            if bytes.len() >= end && bytes[end - 1] == b'\n' {
                return Some((delivery(sender, &bytes[text_at..]), end));
            }
        }
        let end = bytes.iter().position(|&b| b == b'\n')? + 1;
        let line = &bytes[..end];
        let frame = if line.starts_with(b"* ") && contains(line, b" is now s") {
            Frame::Ready
        } else if line.starts_with(b"! ") && contains(line, b"not saved") {
            Frame::NotSaved
        } else {
            Frame::Other
        };
        Some((frame, end))
    }

    /// `*3 $7 message $4 chat $S sI SEQ TIME padding` (CRLF between), or any other line.
    fn next_redis(&self, bytes: &[u8]) -> Option<(Frame, usize)> {
        let header = &self.redis_header;
        if bytes.len() < header.len() && header.starts_with(bytes) {
            return None;
        }
        if bytes.starts_with(header) {
            let end = header.len() + self.size + 2;
            if bytes.len() < end {
                return None;
            }
            let payload = &bytes[header.len()..];
            let (sender, numbers_at) = sender_tag(payload);
            return Some((delivery(sender, &payload[numbers_at..]), end));
        }
        let end = bytes.iter().position(|&b| b == b'\n')? + 1;
        let frame = if &bytes[..end] == b"subscribe\r\n" {
            Frame::Ready
        } else {
            Frame::Other
        };
        Some((frame, end))
    }

    /// Readiness signs a receiver waits for: every sender's rename (peerchat), or its
    /// subscription confirmed (Redis).
    fn readiness_signs(&self, senders: usize) -> usize {
        match self.kind {
            Kind::Peerchat => senders,
            Kind::Redis => 1,
        }
    }
}

/// `<sI> ` at the start of `bytes`: the sender index and where the text starts.
fn nick_prefix(bytes: &[u8]) -> Option<(usize, usize)> {
    if !bytes.starts_with(b"<s") {
        return None;
    }
    let (sender, digits) = parse_digits(&bytes[2..]);
    (digits > 0 && bytes.get(2 + digits..4 + digits) == Some(b"> ")).then_some((sender, 4 + digits))
}

/// `sI ` at the start of a Redis payload: the sender index and where the numbers start.
fn sender_tag(payload: &[u8]) -> (usize, usize) {
    let (sender, digits) = parse_digits(&payload[1..]);
    (sender, 2 + digits)
}

/// A delivery from `sender` whose text (`SEQ TIME padding`) starts `text`.
fn delivery(sender: usize, text: &[u8]) -> Frame {
    Frame::Delivery {
        sender,
        seq: parse_digits(&text[..10]).0 as u64,
        sent_at: parse_digits(&text[11..31]).0 as u64,
    }
}

/// The decimal number at the start of `bytes` and how many digits it had.
fn parse_digits(bytes: &[u8]) -> (usize, usize) {
    let mut value = 0usize;
    let mut digits = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            break;
        }
        value = value * 10 + (b - b'0') as usize;
        digits += 1;
    }
    (value, digits)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Bytes one delivery takes on the wire to a receiver.
fn delivery_frame_len(kind: Kind, size: usize, sender_digits: usize) -> usize {
    match kind {
        Kind::Peerchat => "<s> ".len() + sender_digits + size + 2,
        Kind::Redis => Frames::new(kind, size).redis_header.len() + size + 2,
    }
}
